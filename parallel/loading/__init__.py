"""The model on each rank: checkpoints found and checked (checkpoint), the MXFP4 experts' path settled
(quantization), and the model loaded onto this rank's shard of the mesh (model)."""
