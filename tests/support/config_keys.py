"""The dotted keys of a config, to compare two configs' key sets."""


def flat_keys(config, prefix="") -> set[str]:
  keys = set()
  for k, v in config.items():
    keys |= flat_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
  return keys
