"""AttentionGrid's LongNet example, with the import line and the device line changed.

Original: ``from AttentionGrid import DilatedAttention`` and ``device = "cuda:0"``; here the GPU
is used when there is one, else the CPU (float16 works on the CPU too).
"""

import torch

from efficient_attention.compat.attention_grid import DilatedAttention

# Replace this with your correct GPU device
device = "cuda:0" if torch.cuda.is_available() else "cpu"
dtype = torch.float16

# Create an instance of DilatedAttention
d_model = 512
num_heads = 8
dilation_rate = 2
segment_size = 64
dropout = 0.2  # Specify the dropout rate
attention = DilatedAttention(
    d_model=d_model,
    num_heads=num_heads,
    dilation_rate=dilation_rate,
    segment_size=segment_size,
    dropout=dropout,
).to(device, dtype=dtype)

# Create some dummy input data
batch_size = 16
seq_len = 128
input_dim = d_model
inputs = torch.randn(batch_size, seq_len, input_dim, device=device, dtype=dtype)

# Forward pass
outputs = attention(inputs)

# Print the output shape
print(outputs.shape)  # Expected: [batch_size, seq_len, d_model]
