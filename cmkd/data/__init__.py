"""The data layer: the prepared-data (HDF5) format, the dataset registry and readers
(datasets/), the offline sample generators (samples/), and the input pipeline of training."""
