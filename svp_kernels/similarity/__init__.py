"""The two implementations of the similarity-matching losses (predsim_loss, similarity_loss, alignment_loss)
behind svp_kernels/predsim.py, which validates and picks between them:

    fused.py       the fused path on the device's GEMM (and csrc/cpu/predsim.cpp on CPU tensors): the value and
                   the wanted gradients in one forward
    reference.py   the plain formulation (one-hot, B×B matrices, autograd): the float64 oracle of the tests and
                   backend="reference"
"""
