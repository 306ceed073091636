"""``python -m efficient_attention``: the table of mechanisms, patterns and backends."""
from . import capability_table

if __name__ == "__main__":
    print(capability_table())
