"""What runs inside Ray actors for retrieval: index shards, corpus embedding."""
