"""Training scripts of the shipped demo models (not part of the installed library, as open_clip keeps
``open_clip_train`` apart). Run from the repository root: ``python -m training.train_clip --help``."""
