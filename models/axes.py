"""The logical axis vocabulary and the shape-letter legend used in every variable name.

Every parameter and activation dimension is named from the list below; `sharding/` maps these
names to mesh axes with rule tables, and `models.layouts` reads them to tell a weight's stacked,
input and output dimensions apart. On a single device the names cost nothing. Keep the list
short: a new name is a new decision every rule table has to make.

Shape letters. Array variables carry their shape as a suffix, `x_BxLxD`, with one letter per
dimension, the same letter for the same thing in every module:

  B  batch rows                         V  vocabulary
  L  length: positions of the queries /  E  experts
     activations in this call           X  experts chosen per token (top-k)
  S  key/value positions (cache slots    C  capacity: slots per expert and row
     plus the current chunk)            M  rows of a flattened or sorted slab (tokens x choices)
  D  model width (embed)                I  input features of a weight (the reduced side)
  N  query heads                        O  output features of a weight
  K  key/value heads                    P  positions of a learned position table
  G  query heads per key/value head     R  stacked layers (scan)
  H  head size
  F  feed-forward hidden width
"""

VOCAB = 'vocab'          # V: token vocabulary (embedding rows, logits)
EMBED = 'embed'          # D: model width d_model
HEADS = 'heads'          # N: query heads
KV_HEADS = 'kv_heads'    # K: key/value heads (GQA/MQA groups)
HEAD_DIM = 'head_dim'    # H: per-head width
MLP = 'mlp'              # F: feed-forward hidden width
LAYERS = 'layers'        # R: stacked layers under `scan_layers`
POSITION = 'position'    # P: learned absolute position table rows
EXPERT = 'expert'        # E: MoE experts

# Activations only.
BATCH = 'batch'          # B
LENGTH = 'length'        # L: sequence positions of queries / activations
KV_LENGTH = 'kv_length'  # S: key/value positions (the decoding cache)

ALL = (VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, POSITION, EXPERT,
       BATCH, LENGTH, KV_LENGTH)

# Dimensions that index separate matrices when they lead a weight (a stack of layers or of
# experts), rather than being contracted or produced by it.
STACKED = (LAYERS, EXPERT)
