"""The build stage (`edgediff build`): a bundle's ONNX graphs -> TensorRT engines for the GPU it runs on.

profiles.py derives the optimisation profiles from the manifest and the sizes asked for; tensorrt.py drives
TensorRT. Nothing here imports tensorrt or cuda-python until a build starts.
"""
