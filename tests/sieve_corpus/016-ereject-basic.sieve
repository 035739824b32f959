# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
# pigeonhole-rewrite: ereject->reject
require "ereject";
ereject "refused";
