"""Helpers shared by the test files; fixtures stay in tests/conftest.py.

- ``models``: tiny model presets and hand-built artifacts (a manifest's I/O contract, LoRA files);
- ``inputs``: fixed seeds and the images, masks and control images the tests feed;
- ``references``: diffusers' schedulers and pipelines over sdrt's synthetic weights, the independent
  references of the parity tests, and the 1/255 comparison of sdrt's images with theirs;
- ``pipelines``: exports' pipelines shared by the tests, and one loaded on ort-cuda's code path or openvino;
- ``controlnets``: the SD 3 / 3.5 and FLUX.1 ControlNet tests' comparisons with diffusers and the fakes;
- ``trt_fakes``: cuda-python and TensorRT fakes (host memory, ONNX "engines");
- ``trt_modules``: the real TensorRT modules PyPI has, where installed;
- ``bench_results``: a benchmark result file written by hand;
- ``ldm_layout``, ``optimum_layout``: single-file (LDM) and Optimum-export layouts of a model;
- ``serve_live``: a real server on a free loopback port, decoded images, metric values.
"""
