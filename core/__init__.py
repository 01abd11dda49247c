"""core: the contracts flowprep and trainer share (the bottom layer; it imports neither).

ids       video ids and their rules            layout    the store's file names
splits    classes and train/val/test splits    data      the [data] pipeline section
schema    configuration schemas                atomic    atomic file writes
progress  progress lines and -v/-q
"""
