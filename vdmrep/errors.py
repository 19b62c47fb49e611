"""The error a bad config raises. It imports nothing, so every module that checks a config
key can raise it without importing config_lib (whose `validate` calls those checks)."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""
