# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if address :domain :is :comparator "i;octet" "to" "example.com" {
  fileinto "yes";
} else {
  fileinto "no";
}
