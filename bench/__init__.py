"""perq's benchmark suite: `python -m bench` prints each figure, its goal, and whether it holds.

Every figure is a ratio against a baseline measured in the same run on the same Redis (or an absolute time
against an ideal the run itself defines), because the machines are shared and noisy. See bench/README.md.
"""
