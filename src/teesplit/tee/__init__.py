"""The TRUSTED side: numpy and its own compiled loops (_kernels.c). Nothing here imports torch
or teesplit.gpu."""
