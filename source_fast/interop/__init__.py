"""Interoperability with other attribution libraries.

    from source_fast.interop import kronfluence   # kronfluence 1.0.x factor files and Analyzer shim

The submodules import only torch and safetensors; kronfluence itself is optional.
"""
