"""Helpers shared by the test files; fixtures stay in tests/conftest.py.

- ``models``: tiny model presets and hand-built artifacts (a manifest's I/O contract, LoRA files);
- ``inputs``: fixed seeds and the images, masks and control images the tests feed;
- ``references``: diffusers' schedulers and pipelines over sdrt's synthetic weights, the independent
  references of the parity tests;
- ``trt_fakes``: cuda-python and TensorRT fakes (host memory, ONNX "engines");
- ``trt_modules``: the real TensorRT modules PyPI has, where installed;
- ``bench_results``: a benchmark result file written by hand;
- ``ldm_layout``, ``optimum_layout``: single-file (LDM) and Optimum-export layouts of a model;
- ``serve_live``: a real server on a free loopback port, decoded images, metric values.
"""
