"""The snn target's compiler and runtime: ONNX Linear/ReLU chain -> integer LIF network -> core image.

Stage: targets (snn). Modules, in the order they run:

* ``graph``      ONNX -> the float chain of Linear layers (compile side, needs onnx)
* ``compiler``   chain + calibration inputs -> `Network` by threshold balancing
* ``network``    the integer network (data) and its invariants
* ``image``      `Network` <-> ``core.egc`` bytes (sections with CRC32)
* ``stream``     ``core.egc`` <-> ``stream.bin`` (UART-style frames with CRC-16)
* ``neurocorex`` ``neurocorex.bin`` for NeuroCoreX-style cores (<= 90 neurons)
* ``nir_export`` `Network` -> ``model.nir``
* ``emulator``   the emulator: the definition of the neuron model (runtime side); the literal step loop
* ``layered``    the same semantics evaluated layer by layer over blocks of steps (the default, faster)
* ``product``    exact int8 x spike products: onnxruntime MatMulInteger, else float32 numpy
* ``metrics``    per-run spikes, synaptic events, neuron updates, timesteps and energy

The runtime side (``network``, ``image``, ``emulator``, ``layered``, ``product``, ``metrics``) imports numpy,
and onnxruntime when it is installed; never torch or onnx.
"""
