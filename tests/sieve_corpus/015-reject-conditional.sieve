# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require "reject";
if header :contains "subject" "report" {
  reject "no reports";
}
