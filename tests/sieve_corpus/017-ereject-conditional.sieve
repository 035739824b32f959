# envelope: from=alice@example.org to=bob+lists@example.com message=messages/large.eml
# pigeonhole-rewrite: ereject->reject
require "ereject";
if size :over 10K {
  ereject "too big";
}
