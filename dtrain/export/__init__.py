"""`dtrain export`: a run's trained model as artifacts to deploy (state_dict, safetensors, torch.export, ONNX),
each checked against the model in a fresh process. Imports torch: the CLI imports it only to export."""
