"""Results coming in: bytes decoded and validated into a result and its facts (pure)."""
