# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
set "x" "Hello";
if string :is "${x}" "hello" { fileinto "ci"; }
if string :is :comparator "i;octet" "${x}" "hello" { fileinto "octet"; }
