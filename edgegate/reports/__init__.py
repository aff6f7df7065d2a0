"""Stage 8, reports: what ``bench`` and ``compare`` measured -> statistics, terminal text, JSON, HTML.

``stats`` (latency statistics, gate histograms, host and memory facts) and ``bench_text`` are
torch-free and need numpy alone, so ``edgegate bench`` runs on a runtime-only device. The compare
side (``onnx_probe``, ``layer_sqnr``, ``compare_text``, ``html``) imports onnx and torch, and
matplotlib only to draw plots (``html``).
"""
