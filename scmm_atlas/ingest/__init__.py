"""Getting data into a store: reading input files (h5ad, h5mu, 10x h5), checking
they hold counts, writing them as a new store or appended cells, the feature statistics and
selection that training reads, and gene activity derived from a store's ATAC. One layer above the
store backends, which know nothing of input files."""
