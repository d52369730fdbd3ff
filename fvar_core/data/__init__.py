"""Data on disk: image folders, image files, token shards, the tokenizing that writes them."""
