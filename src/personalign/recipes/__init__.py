"""One file per workflow: a config dataclass and ``main(cfg)``; the CLI only parses and calls these."""
