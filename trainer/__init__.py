"""trainer: train and evaluate the two streams and fuse their scores."""
