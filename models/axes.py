"""The logical axis vocabulary: every parameter and activation dimension is named from this list.

`sharding/` maps these names to mesh axes with rule tables; on a single device the names cost
nothing. Keep the list short: a new name is a new decision every rule table has to make.
"""

VOCAB = 'vocab'          # token vocabulary (embedding rows, logits)
EMBED = 'embed'          # model width d_model
HEADS = 'heads'          # query heads
KV_HEADS = 'kv_heads'    # key/value heads (GQA/MQA groups)
HEAD_DIM = 'head_dim'    # per-head width
MLP = 'mlp'              # feed-forward hidden width
LAYERS = 'layers'        # stacked layers under `scan_layers`
POSITION = 'position'    # learned absolute position table rows
EXPERT = 'expert'        # MoE experts

# Activations only.
BATCH = 'batch'
LENGTH = 'length'        # sequence positions of queries / activations
KV_LENGTH = 'kv_length'  # key/value positions (the decoding cache)

ALL = (VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, POSITION, EXPERT,
       BATCH, LENGTH, KV_LENGTH)
