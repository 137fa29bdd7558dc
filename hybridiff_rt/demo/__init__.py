"""The demo apart from the runtime: bundled tiny trained models, their training, the quality
harness and the ``hybridiff-rt demo`` command.

* :mod:`.bundled`: two tiny trained text-to-image pipelines (an SDXL-style U-Net and an SD3-style
  MMDiT drawing handwritten digits), their weights, a digit classifier and the training code.
* :mod:`.quality`: PSNR, SSIM, classifier accuracy and Frechet distance between two image sets.
* :mod:`.measure`: guidance strength and discrepancy curves of the bundled models.
* :mod:`.command`: ``hybridiff-rt demo`` (serial vs two-process hybrid run, table and plots).

The runtime core never imports this package; it sits on top of it.
"""
