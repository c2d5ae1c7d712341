"""The TRUSTED side: numpy only. Nothing here imports torch or teesplit.gpu."""
