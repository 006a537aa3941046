"""Target descriptors: what each chip runs in int8, kept as data."""

from .target import Fusion, Target, WeightRule, builtin_targets, load_target, parse_target

__all__ = ["Fusion", "Target", "WeightRule", "builtin_targets", "load_target", "parse_target"]
