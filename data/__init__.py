"""Training data: typed samples -> prompt templates -> tokens + answer-only labels -> packed
fixed-length rows (memory-mapped cache) -> deterministic data-parallel micro-batches."""
from .dataset import TokenDataset, build_dataset
from .loader import StepLoader
from .samples import SAMPLE_TYPES, SampleError, parse_sample
from .templates import render, render_prompt
from .tokenize import encode, encode_prompt

__all__ = ["TokenDataset", "build_dataset", "StepLoader", "SAMPLE_TYPES", "SampleError", "parse_sample", "render",
           "render_prompt", "encode", "encode_prompt"]
