"""The embedded testbed: a base/aligned/fine-tuned triple built on one CPU with no hub."""
