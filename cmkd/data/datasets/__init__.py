"""One module per dataset: validate, download and prepare (raw files -> prepared HDF5), each
registered by name in cmkd.data.registry. Readers never import the sample generators."""
