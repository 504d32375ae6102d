"""Input data: sources (numpy arrays in memory), augmentation ops (tf.data) and the pipeline."""
