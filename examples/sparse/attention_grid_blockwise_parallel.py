"""AttentionGrid's two ``BlockwiseParallelJax`` examples (README and "Blockwise Parallel
Documentation"), run in PyTorch.

Lines changed from the originals (everything else is verbatim):

Example 1 (README):
* ``from AttentionGrid import BlockwiseParallelJax`` ->
  ``from efficient_attention.compat.attention_grid import BlockwiseParallelJax``
* ``import jax.numpy as jnp`` -> ``import torch as jnp`` (``jnp.arange(100).reshape(1, 100)`` then works unchanged)
* ``jnp.random.rand(1, 100, 768)`` -> ``jnp.rand(1, 100, 768)`` (``jnp.random.rand`` does not exist in JAX either)
* ``jnp.random.rand(1, 1, 100, 100)`` -> ``jnp.rand(1, 1, 100, 100)``

Example 2 (documentation):
* ``from jax import random`` -> ``from torch import random``
* ``import jax.numpy as jnp`` -> ``import torch as jnp`` (``jnp.ones``, ``jnp.arange(...)[None, :]`` unchanged)
* ``from AttentionGrid import BlockwiseParallelJax`` ->
  ``from efficient_attention.compat.attention_grid import BlockwiseParallelJax``
* ``key = random.PRNGKey(0)`` -> ``key = random.manual_seed(0)`` (a ``torch.Generator``)
* ``random.normal(key, (batch_size, sequence_length, block.hidden_size))`` ->
  ``jnp.randn((batch_size, sequence_length, block.hidden_size), generator=key)``

The random attention mask of example 1 is read as the original reads it: values > 0 attend.
The shape comment of example 2 prints ``torch.Size([8, 128, 768])``.
"""

# ---- Example 1 (README) ----
import torch as jnp

from efficient_attention.compat.attention_grid import BlockwiseParallelJax

# Initialize the class
bpjax = BlockwiseParallelJax(
    q_chunk_size=64, k_chunk_size=64, hidden_size=768, num_heads=12, rotary_dim=32, intermediate_size=3072
)

# Suppose we have hidden_states, attention_mask, and position_ids as input data
hidden_states = jnp.rand(1, 100, 768)
attention_mask = jnp.rand(1, 1, 100, 100)
position_ids = jnp.arange(100).reshape(1, 100)

# You can now apply the attention mechanism to your input data
output = bpjax.forward(hidden_states, attention_mask, position_ids)
output_readme = output

# ---- Example 2 (documentation) ----
# Initialize

# the documentation's imports, where the documentation has them
import torch as jnp  # noqa: E402
from torch import random  # noqa: E402

from efficient_attention.compat.attention_grid import BlockwiseParallelJax  # noqa: E402

# Initialize transformer block
block = BlockwiseParallelJax(
    q_chunk_size=64,
    k_chunk_size=64,
    hidden_size=768,
    num_heads=12,
    rotary_dim=64,
    intermediate_size=3072,
)

# Create a batch of input tensors
key = random.manual_seed(0)
batch_size = 8
sequence_length = 128
hidden_states = jnp.randn((batch_size, sequence_length, block.hidden_size), generator=key)

# Create attention mask
attention_mask = jnp.ones((batch_size, 1, 1, sequence_length))

# Create position ids
position_ids = jnp.arange(sequence_length)[None, :]

# Forward pass
output = block.forward(hidden_states, attention_mask, position_ids)

print(output.shape)  # prints: (8, 128, 768)
