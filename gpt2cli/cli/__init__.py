"""The `gpt2` command: one small module per subcommand. No JAX imports at module level."""
