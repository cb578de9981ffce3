"""capfilt's speed targets: each module is a benchmark against a baseline measured in the same run;
`python -m benchmarks` runs them all at a small size and prints one table."""
