"""flowprep: decode videos and compute TV-L1 flow into JPEG or HDF5 stores."""
