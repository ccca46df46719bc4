"""The offline samples: generators of small raw datasets in the real datasets' layouts, each a
registered dataset of its own. They import the readers (cmkd.data.datasets); never the reverse."""
