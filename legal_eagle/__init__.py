"""Legal-Eagle: a self-hosted Chinese legal consultation demo on LMDeploy TurboMind."""

__version__ = "0.1.0"

MODEL_ID = "wangzixinxinxin/Legal-Eagle-InternLM2-chat-7B-Merged"
