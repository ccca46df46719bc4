"""Dataset readers, generators and the prepared-data (HDF5) format."""
