"""Corpus preprocessing: manifests in, WebDataset shards out (see ../shared/design/data-contract.md)."""
