"""What the tests share: a private Redis, fake provider servers, the in-process harness."""
