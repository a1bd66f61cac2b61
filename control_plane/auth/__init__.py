"""Accounts: sign-up, sign-in (password and Google), email tokens, sessions and CSRF."""
