"""Frugal models: a pure-functional decoder-only Transformer family (see `transformer.py`)."""

from models.attention import init_cache
from models.config import ModelConfig, gpt2_style
from models.transformer import Transformer, stack_layers, unstack_layers
