"""What every layer uses: the typed configuration, user errors, logs, stage folders and datasets,
image and text decoding, and the code deps of each stage."""
