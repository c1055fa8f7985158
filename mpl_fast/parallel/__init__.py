"""Where the networks live: memory planning, device placement, distributed process groups."""
