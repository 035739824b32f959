# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require "variables";
set "a" "not an address";
redirect "${a}";
