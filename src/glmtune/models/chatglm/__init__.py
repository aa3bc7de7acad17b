"""The ChatGLM family (ChatGLM-6B, ChatGLM2/3-6B, GLM-4-9B-chat) as THUDM publishes it, without remote code."""
