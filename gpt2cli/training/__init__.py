"""Training's home: prepared token folders, run settings and the run driver."""
